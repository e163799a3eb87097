"""Training plumbing shared by the training stages: Ray Train launch and the worker loop (`distributed`), the typed
training-task registry (`tasks`), post-training data and model sources (`posttrain`)."""
