"""Reinforcement learning from rewards (issue 17): reward functions and, next, the RL stage's pieces. Ray-free, except
the vLLM rollout engines (`rollout.VLLMEngines`), which import Ray when used."""
