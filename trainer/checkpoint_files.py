"""The names of a checkpoint's files (`trainer.checkpoint` writes them). Apart, without
torch, for readers that only look at them: a shared group's trial processes (thin clients
that never train) import no torch at all."""

WEIGHTS = "trainable.safetensors"  # projector + LoRA weights
STATE = "state.pt"  # optimizer / scheduler / scaler state and RNG states
META = "trainer_state.json"  # step and NaN bookkeeping
