"""Training a counting model: the parameter contract (TrainConfig), losses and the epoch loop."""
