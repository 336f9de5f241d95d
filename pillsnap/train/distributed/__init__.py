"""Training beyond one process: torchrun inside the ONE training task (launch.py starts it, worker.py is what each
rank runs) and how many processes a stage runs (world.py). What the loop needs from the other ranks is
train/services/collectives.py."""
