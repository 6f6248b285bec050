"""The shared training loop and what it uses: diffusion maths, optimizer, checkpoints, samples, trackers."""
