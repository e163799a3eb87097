"""Reinforcement learning from rewards (issue 17): reward functions and, next, the RL stage's pieces. Ray-free."""
