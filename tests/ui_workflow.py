"""Build UI-format (litegraph) workflow JSON from code, using the nodes' own INPUT_TYPES.

Used to write and regenerate ``workflows/*.json``; widget values are given by input name and
everything else (slots, links, widget order, seed controls) is derived from the node classes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from tests.workflow_check import CORE_NODES, _is_widget


class UIWorkflow:
    def __init__(self, mappings: Dict[str, type]):
        self.mappings = mappings
        self.nodes: List[dict] = []
        self.links: List[list] = []

    def _spec(self, node_type):
        if node_type in self.mappings:
            cls = self.mappings[node_type]
            names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
            return cls.INPUT_TYPES(), list(zip(names, cls.RETURN_TYPES))
        core = CORE_NODES[node_type]
        return core["inputs"], [(t, t) for t in core["outputs"]]

    def add(self, node_type: str, pos, title: Optional[str] = None, size=(320, 200), extra_widgets=(), **widgets) -> int:
        inputs, outputs = self._spec(node_type)
        node_id = len(self.nodes) + 1
        values, slots = [], []
        for section in ("required", "optional"):
            for name, decl in inputs.get(section, {}).items():
                opts = decl[1] if len(decl) > 1 else {}
                if _is_widget(decl):
                    default = opts.get("default", decl[0][0] if isinstance(decl[0], list) and decl[0] else None)
                    values.append(widgets.pop(name, default))
                    if opts.get("control_after_generate"):
                        values.append("fixed")
                else:
                    slots.append({"name": name, "type": decl[0], "link": None})
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": slots,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": node_type}, "widgets_values": values + list(extra_widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def connect(self, src: int, output: str, dst: int, input_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(s["outputs"]) if o["name"] == output)
        target = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        link_id = len(self.links) + 1
        kind = s["outputs"][slot]["type"]
        self.links.append([link_id, src, slot, dst, target, kind])
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][target]["link"] = link_id

    def to_json(self) -> dict:
        for node in self.nodes:
            node["inputs"] = [i for i in node["inputs"] if i["link"] is not None or not i.get("optional")]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def assert_workflows_built(folder: Path, built: Dict[str, dict]) -> None:
    """Each shipped workflow file equals what its builder makes now (so edits go through the builder)."""
    for name, data in built.items():
        assert json.loads((folder / name).read_text()) == json.loads(json.dumps(data)), name


def write_workflows(folder: Path, built: Dict[str, dict]) -> None:
    """Write the built workflows (``python -m tests.test_nodes_<method>`` regenerates a method's files)."""
    for name, data in built.items():
        (folder / name).write_text(json.dumps(data, indent=1) + "\n")
        print("wrote", folder / name)
