"""Training: the loop (loop.py) calls one optimizer step at a time (step.py) over micro batches
drawn from the data package; the loss (loss.py), the model's half of packing (packing.py),
optimizers and schedules (optim.py), precision and device (precision.py), the loop's resumable
state (state.py), checkpoints, signals and torch.compile live beside them."""
