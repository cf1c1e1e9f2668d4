"""Server defaults are written once, in gradserve_server.app.Config: `gradserve serve` takes its
flag defaults from it, and README.md's flag table states the same values."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gradserve_server.app import Config, MiB
from gradserve_server.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent
# a flag of the table -> its Config field, and the unit the flag counts in
FIELDS = {"--host": "host", "--port": "port", "--max-message-mib": "max_message_bytes", "--cache-mib": "cache_bytes",
          "--max-call-mib": "max_call_bytes", "--max-inflight-mib": "max_inflight_bytes",
          "--store": "store", "--residual-mib": "residual_bytes", "--residual-ttl": "residual_ttl",
          "--residual-sessions": "residual_sessions", "--plan-cache-mib": "plan_cache_bytes",
          "--tensor-store-mib": "tensor_store_bytes", "--tensor-ttl": "tensor_ttl", "--token-file": "token",
          "--tls-cert": "tls_cert", "--tls-key": "tls_key", "--metrics-port": "metrics_port",
          "--max-concurrent": "max_concurrent", "--threads": "threads", "--grace": "grace",
          "--metrics-host": "metrics_host", "--max-watchers": "max_watchers",
          "--max-health-watchers": "max_health_watchers", "--job-retention-count": "job_retention_count",
          "--job-retention-days": "job_retention_days", "--processes": "processes"}
CONFIG_ONLY = {"max_nodes", "max_elements", "max_job_name", "max_optimizer_json",  # limits of requests' contents
               "process_tag"}  # set by --processes in each server process it starts
UNITS = {"--max-message-mib": MiB, "--cache-mib": MiB, "--residual-mib": MiB, "--tensor-store-mib": MiB,
         "--max-call-mib": MiB, "--max-inflight-mib": MiB, "--plan-cache-mib": MiB}


def serve_defaults():
    return build_parser().parse_args(["serve"])


def test_serve_without_flags_runs_the_default_config():
    assert config_from_args(serve_defaults()) == Config()


def test_every_flag_default_is_configs():
    args = serve_defaults()
    checked = 0
    for field in dataclasses.fields(Config):
        flag = {v: k for k, v in FIELDS.items()}.get(field.name, "--" + field.name.replace("_", "-"))
        dest = flag[2:].replace("-", "_")
        if not hasattr(args, dest):
            continue  # not a flag (CONFIG_ONLY)
        want = getattr(Config(), field.name)
        got = getattr(args, dest)
        assert (got * UNITS[flag] if flag in UNITS else got) == want, (flag, got, want)
        checked += 1
    assert checked == len(dataclasses.fields(Config)) - len(CONFIG_ONLY)


def readme_flag_table() -> dict[str, str]:
    """{flag: the default README.md states for it} from the service's flag table."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| flag | default | what |")
    stated = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        flags_cell, defaults_cell, _ = (c.strip() for c in line.strip("|").split("|", 2))
        flags = re.findall(r"`(--[a-z-]+)", flags_cell)
        defaults = [d.strip().strip("`") for d in defaults_cell.split(",")]
        if len(defaults) == 1:
            defaults *= len(flags)  # one value for every flag of the row
        assert len(flags) == len(defaults) and flags, line
        stated.update(zip(flags, defaults, strict=True))
    return stated


def _value(stated: str, unit: int) -> object:
    if stated == "none":
        return None
    number = re.fullmatch(r"(\d+(?:\.\d+)?)(?: s)?", stated)
    return float(number[1]) * unit if number else stated


def test_readme_flag_table_states_configs_defaults():
    stated = readme_flag_table()
    assert set(stated) == set(FIELDS), "a flag of README's table is missing here, or one here is not in the table"
    config = Config()
    for flag, text in stated.items():
        want = getattr(config, FIELDS[flag])
        assert _value(text, UNITS.get(flag, 1)) == want, f"README says {flag} defaults to {text}; Config says {want}"
