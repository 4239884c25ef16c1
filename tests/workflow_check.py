"""Static checks of UI-format workflow JSON against the pack's node definitions.

Checks that every node type exists, links join compatible types, and widget values are valid
for their declared inputs (count, type, range, combo membership).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pkl")

# The few core nodes our workflows use, declared like pack nodes (ComfyUI 0.8.0 definitions).
CORE_NODES = {
    "PreviewImage": {"inputs": {"required": {"images": ("IMAGE", {})}}, "outputs": ()},
    "SaveImage": {"inputs": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
                  "outputs": ()},
    "LoadImage": {"inputs": {"required": {"image": ("COMBO_ANY", {})}}, "outputs": ("IMAGE", "MASK"),
                  "extra_widgets": 1},  # the upload button's value
    "CheckpointLoaderSimple": {"inputs": {"required": {"ckpt_name": ("COMBO_ANY", {})}},
                               "outputs": ("MODEL", "CLIP", "VAE")},
    "CLIPVisionLoader": {"inputs": {"required": {"clip_name": ("COMBO_ANY", {})}}, "outputs": ("CLIP_VISION",)},
    "KSampler": {"inputs": {"required": {
        "model": ("MODEL", {}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
        "sampler_name": ("COMBO_ANY", {}), "scheduler": ("COMBO_ANY", {}),
        "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}), "latent_image": ("LATENT", {}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}, "outputs": ("LATENT",)},
    "EmptyLatentImage": {"inputs": {"required": {"width": ("INT", {"default": 512, "min": 16, "max": 16384}),
                                                 "height": ("INT", {"default": 512, "min": 16, "max": 16384}),
                                                 "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}},
                         "outputs": ("LATENT",)},
    "VAEDecode": {"inputs": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}, "outputs": ("IMAGE",)},
    "LoadImageMask": {"inputs": {"required": {"image": ("COMBO_ANY", {}), "channel": (["alpha", "red", "green", "blue"], {})}},
                      "outputs": ("MASK",), "extra_widgets": 1},  # the upload button's value
    "PreviewAny": {"inputs": {"required": {"source": ("*", {})}}, "outputs": ()},
    "Preview3D": {"inputs": {"required": {"model_file": ("STRING", {"default": ""})},
                             "optional": {"camera_info": ("LOAD3D_CAMERA", {}), "bg_image": ("IMAGE", {})}}, "outputs": ()},
    "Note": {"inputs": {"required": {"text": ("STRING", {})}}, "outputs": ()},
    "MarkdownNote": {"inputs": {"required": {"text": ("STRING", {})}}, "outputs": ()},
}


def _spec(node_type: str, mappings: Dict[str, type]):
    if node_type in mappings:
        cls = mappings[node_type]
        return {"inputs": cls.INPUT_TYPES(), "outputs": tuple(cls.RETURN_TYPES)}
    return CORE_NODES.get(node_type)


def _declared_inputs(spec) -> Dict[str, tuple]:
    out = {}
    for section in ("required", "optional"):
        out.update(spec["inputs"].get(section, {}))
    return out


def _is_widget(decl: tuple) -> bool:
    kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO_ANY"


def _check_value(name: str, decl: tuple, value) -> List[str]:
    kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    errors = []
    if isinstance(kind, list):
        # Model-file combos (options carry "nvs_model_folder") list whatever is installed: any file name
        # with a model extension is valid in a shared workflow.
        model_file = opts.get("nvs_model_folder") and isinstance(value, str) and value.lower().endswith(MODEL_FILES)
        if value not in kind and not model_file:
            errors.append(f"{name}={value!r} is not one of {kind}")
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            errors.append(f"{name}={value!r} is not a valid {kind}")
        else:
            if "min" in opts and value < opts["min"]:
                errors.append(f"{name}={value} is below min {opts['min']}")
            if "max" in opts and value > opts["max"]:
                errors.append(f"{name}={value} is above max {opts['max']}")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        errors.append(f"{name}={value!r} is not a BOOLEAN")
    elif kind in ("STRING", "COMBO_ANY") and not isinstance(value, str):
        errors.append(f"{name}={value!r} is not a string")
    return errors


def types_compatible(output_type: str, input_type) -> bool:
    if isinstance(input_type, list):
        input_type = "COMBO"
    if output_type == "*" or input_type == "*":
        return True
    return bool(set(output_type.split(",")) & set(str(input_type).split(",")))


def validate_workflow(path: Path, mappings: Dict[str, type]) -> List[str]:
    data = json.loads(Path(path).read_text())
    errors: List[str] = []
    nodes = {n["id"]: n for n in data.get("nodes", [])}
    if not nodes:
        return [f"{path}: no nodes"]
    specs = {}
    for node_id, node in nodes.items():
        spec = _spec(node["type"], mappings)
        if spec is None:
            errors.append(f"node {node_id}: unknown type {node['type']!r}")
            continue
        specs[node_id] = spec
        declared = _declared_inputs(spec)
        widgets = [(name, decl) for name, decl in declared.items() if _is_widget(decl)]
        values = list(node.get("widgets_values", []))
        expected = []
        for name, decl in widgets:
            expected.append((name, decl))
            if decl[0] == "INT" and (decl[1].get("control_after_generate") if len(decl) > 1 else False):
                expected.append((f"{name}:control", ("CONTROL", {})))
        expected_count = len(expected) + spec.get("extra_widgets", 0)
        if len(values) != expected_count:
            errors.append(f"node {node_id} ({node['type']}): {len(values)} widget values, expected {expected_count} "
                          f"({', '.join(n for n, _ in expected)})")
            continue
        for (name, decl), value in zip(expected, values):
            if decl[0] == "CONTROL":
                if value not in SEED_CONTROLS:
                    errors.append(f"node {node_id}: {name} must be one of {sorted(SEED_CONTROLS)}, got {value!r}")
            else:
                errors.extend(f"node {node_id} ({node['type']}): {e}" for e in _check_value(name, decl, value))
        required = spec["inputs"].get("required", {})
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, decl in required.items():
            if not _is_widget(decl) and name not in linked:
                errors.append(f"node {node_id} ({node['type']}): required input {name!r} is not connected")
    for link in data.get("links", []):
        link_id, src, src_slot, dst, dst_slot, link_type = link[:6]
        if src not in specs or dst not in specs:
            continue
        outputs = specs[src]["outputs"]
        if src_slot >= len(outputs):
            errors.append(f"link {link_id}: node {src} has no output {src_slot}")
            continue
        dst_inputs = nodes[dst].get("inputs", [])
        if dst_slot >= len(dst_inputs):
            errors.append(f"link {link_id}: node {dst} has no input slot {dst_slot}")
            continue
        slot = dst_inputs[dst_slot]
        declared = _declared_inputs(specs[dst]).get(slot["name"])
        if declared is None:
            errors.append(f"link {link_id}: node {dst} ({nodes[dst]['type']}) has no input {slot['name']!r}")
            continue
        if slot.get("link") != link_id:
            errors.append(f"link {link_id}: input {slot['name']!r} of node {dst} does not refer back to it")
        if not types_compatible(outputs[src_slot], declared[0]):
            errors.append(f"link {link_id}: {outputs[src_slot]} output of node {src} cannot feed "
                          f"{declared[0]} input {slot['name']!r} of node {dst}")
        if link_type not in ("*", outputs[src_slot]):
            errors.append(f"link {link_id}: declared type {link_type} but node {src} outputs {outputs[src_slot]}")
    return errors


def ui_to_api(path: Path, mappings: Dict[str, type]) -> dict:
    """Convert a UI-format workflow to the API prompt format the server runs (what the editor sends)."""
    data = json.loads(Path(path).read_text())
    links = {link[0]: link for link in data.get("links", [])}
    prompt = {}
    for node in data["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        spec = _spec(node["type"], mappings)
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, decl in _declared_inputs(spec).items():
            if _is_widget(decl):
                inputs[name] = next(values)
                if decl[0] == "INT" and len(decl) > 1 and decl[1].get("control_after_generate"):
                    next(values)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        if node["type"] == "LoadImage":
            inputs = {"image": node["widgets_values"][0]}
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
