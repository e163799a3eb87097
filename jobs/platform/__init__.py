"""Platform code every stage shares: settings and the job CLI/result contract (`runtime`), MLflow tracking and
registration (`tracking`), model references (`registry`), config files (`configfile`), plots (`plots`), joining Ray
(`raycluster`)."""
