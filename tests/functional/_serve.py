"""Serve one proxyd worker in the foreground from a JSON config: ``python _serve.py CONFIG``.

For tests that must observe the proxy as its own process (RSS under load); stop it with SIGTERM.
"""

from __future__ import annotations

import json
import sys

from proxyd.config.models import GatewayConfig
from proxyd.worker import run_single


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = GatewayConfig.model_validate(json.load(f))
    run_single(config, sys.argv[1])


if __name__ == "__main__":
    main()
