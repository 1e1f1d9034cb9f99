"""Regenerate the RayService manifest's serveConfigV2 from serve_config.yaml, so the two cannot drift.

    python -m scripts.kuberay_manifest           # rewrite control/kuberay/rayservice.yaml (+ serve_config.k8s.yaml)
    python -m scripts.kuberay_manifest --check   # exit 1 if the committed files differ from what it would write

The Kubernetes substitutions: the proxy listens on 0.0.0.0 inside the pod, every version reads the
knowledge bases from the shared volume at /kb, and the gateway reads its API key from the Secret's mount.
Both documents go through ruamel.yaml's round trip, so the comments of each are kept.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml.scalarstring import LiteralScalarString

from control.document import ServeDocument, round_trip_yaml
from control.serve_config import GATEWAY_BUILDER, PIPELINE_BUILDER, is_app

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_config.yaml"
MANIFEST = ROOT / "control" / "kuberay" / "rayservice.yaml"
# serveConfigV2 as a file in the image, for the head's preStop drain (`scripts.stop --config`).
K8S_SERVE_CONFIG = ROOT / "control" / "kuberay" / "serve_config.k8s.yaml"

HTTP_HOST = "0.0.0.0"
KB_ROOT = "/kb"
API_KEY_FILE = "/etc/rag-serve/api-key/api_key"
HEADER = ("Generated from serve_config.yaml by `python -m scripts.kuberay_manifest`: edit that file, then rerun.\n"
          "The Kubernetes substitutions: http_options.host, retrieval.kb_root, the gateway's api_key_file.")


def _dump(data: Any) -> str:
    out = io.StringIO()
    round_trip_yaml().dump(data, out)
    return out.getvalue()


def serve_config_v2(serve_config_text: str) -> str:
    """serve_config.yaml with the Kubernetes substitutions, comments kept."""
    config = ServeDocument.from_text(serve_config_text).data
    config.ca.comment = None  # its header tells how to deploy it locally
    config.yaml_set_start_comment(HEADER)
    config["http_options"]["host"] = HTTP_HOST
    config["http_options"].yaml_add_eol_comment("inside the pod; the pod network and a Service front it", "host")
    for app in config["applications"]:
        if is_app(app, PIPELINE_BUILDER):
            app["args"]["retrieval"]["kb_root"] = KB_ROOT
        elif is_app(app, GATEWAY_BUILDER):
            app["args"]["api_key_file"] = API_KEY_FILE
    return _dump(config)


def render_manifest(manifest_text: str, serve_config_v2_text: str) -> str:
    manifest = round_trip_yaml().load(manifest_text)
    manifest["spec"]["serveConfigV2"] = LiteralScalarString(serve_config_v2_text)
    return _dump(manifest)


def expected_files() -> dict[Path, str]:
    v2 = serve_config_v2(SERVE_CONFIG.read_text(encoding="utf-8"))
    return {MANIFEST: render_manifest(MANIFEST.read_text(encoding="utf-8"), v2), K8S_SERVE_CONFIG: v2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date with serve_config.yaml: {', '.join(map(str, stale))}; "
              "run `python -m scripts.kuberay_manifest`", file=sys.stderr)
        return 1
    print(f"rewrote {', '.join(map(str, stale))}" if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
