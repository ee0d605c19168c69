"""What the learner, the engines and the driver share, so that neither side imports the other: the records that
travel (`types`), the weight protocol (`weight_sync`), model resolution (`models`), cost balancing (`balance`)."""
