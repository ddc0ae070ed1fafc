"""The torch side that runs the user's model: loading the task, the arms' recipes, training, distribution."""
