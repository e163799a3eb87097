"""Training plumbing shared by the training stages: Ray Train launch and the worker loop (`distributed`), the typed
training-task registry (`tasks`), files shared by driver and workers (`storage`), end-of-training samples
(`sampling`), post-training data and model sources (`posttrain`)."""
