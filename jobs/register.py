"""Register a model that a training job trained and exported but could not register (exit status 3).

    python -m jobs.register $TULPAR_HOME/models/<name>/.staging-<run>.pending.json

When the tracking server stays unavailable through registration's retries ($TULPAR_REGISTER_RETRY_S, default 300 s),
a training job (pretrain, sft, dpo, distill, rl, reward_model) keeps its HF export in the staging directory, writes
the registration it meant to make beside it (`.pending.json`: name, stage, alias, version tags, MLflow run) and exits
with status 3, naming the checkpoint, the export and this command. Run it, with MLFLOW_TRACKING_URI pointing at the
same server, once the server is back: the export is logged to the job's own MLflow run, registered as a new version,
tagged and aliased exactly as the job would have done, and moved to $TULPAR_HOME/models/<name>/<version>. It prints
one JSON line {"model_uri", "hf_dir"}. User errors print `error: ...` and exit 2; an unreachable server exits 3 again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from jobs.platform import tracking
    from jobs.platform.runtime import EXIT_NOT_REGISTERED, Settings, run_cli

    p = argparse.ArgumentParser(
        prog="python -m jobs.register",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pending", type=Path, help="the .pending.json file the training job named")
    args = p.parse_args(argv)

    def body() -> None:
        model_uri, hf_dir = tracking.register_pending(args.pending, Settings.from_env())
        print(json.dumps({"model_uri": model_uri, "hf_dir": str(hf_dir)}))

    try:
        return run_cli(body)
    except tracking.TrackingUnavailable as exc:
        print(f"error: {exc}: the registration stays pending in {args.pending}", file=sys.stderr)
        return EXIT_NOT_REGISTERED


if __name__ == "__main__":
    sys.exit(main())
