"""Files that appear whole or not at all: written under a temporary name, renamed when complete."""

import json
import os

PARTIAL_SUFFIX = ".partial"


def write_json(path: str, data: dict):
    with open(path + PARTIAL_SUFFIX, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(path + PARTIAL_SUFFIX, path)


def remove_if_exists(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
