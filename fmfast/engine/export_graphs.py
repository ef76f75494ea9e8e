"""The graph exporters behind ``fmfast export``: ONNX (``torch.onnx.export(dynamo=True)``), pt2
(``torch.export.save``) and OpenVINO IR (``openvino.convert_model`` of that ONNX graph,
``openvino.save_model``), each from ``torch.export`` with a free batch dimension.

Every file takes ``video`` uint8 [B,3,T,W,H] and/or ``current`` float32 [B,2S,3] and returns
``logits`` [B,2] or [B,2,W,H], and carries fmfast's description of the model (ONNX
``metadata_props``, OpenVINO ``rt_info``, the pt2 extra file ``fmfast.json``) under the key
``fmfast``. Writers only write: ``fmfast.engine.export`` checks the file and puts it in place.

Warnings from the exporters reach the caller as they are. torch 2.13's exporter itself warns
twice with a FutureWarning about ``LeafSpec`` (raised inside ``ExportedProgram.run_decompositions``
when it deep-copies the call graph; torch's own, nothing in the model triggers it) and logs that
torchvision's operators are skipped when torchvision is not installed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fmfast.engine.description import KEY
from fmfast.engine.exported import need
from fmfast.errors import ExportError

BATCH_MAX = 65536


def _failed(path, what: str, e: Exception) -> ExportError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return ExportError(f"{path}: {what} failed ({type(e).__name__}: {first})")


def _program(w, path: Path):
    """``w`` through ``torch.export``, traced at batch 2 (a batch of 1 would be specialised into
    the graph as a constant), the batch axis of all inputs one free ``batch`` dimension."""
    batch = torch.export.Dim("batch", min=1, max=BATCH_MAX)
    try:
        return torch.export.export(w, w.example(2), dynamic_shapes=tuple({0: batch} for _ in w.input_names()))
    except Exception as e:  # noqa: BLE001 -- torch.export's errors are many classes, each a long report
        raise _failed(path, "torch.export", e) from None


def write_onnx(w, path: Path, description: str, opset: int = 18) -> None:
    """``w`` (an ``fmfast.engine.export.Exported``) as ONNX at ``path``, one file (weights inside)."""
    need("onnx", "ONNX export", ExportError)
    need("onnxscript", "ONNX export", ExportError)  # the torch.export-based exporter translates with it
    exported = _program(w, path)
    try:
        # the ExportedProgram, not the module + dynamic_shapes: given those, torch renames the
        # shared batch axis once per input and warns that the second name "will not be used"
        program = torch.onnx.export(exported, input_names=w.input_names(), output_names=["logits"],
                                    opset_version=opset, dynamo=True, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise _failed(path, "ONNX export", e) from None
    program.rename_axes({program.model.graph.inputs[0].shape[0]: "batch"})
    program.model.metadata_props[KEY] = description
    program.save(str(path), external_data=False)


def write_pt2(w, path: Path, description: str, opset: int = 18) -> None:
    """``w`` as a ``torch.export`` ExportedProgram archive at ``path`` (the description in
    ``fmfast.json``): ``torch.export.load(path).module()(video, current)``."""
    torch.export.save(_program(w, path), str(path), extra_files={f"{KEY}.json": description})


def write_openvino(w, path: Path, description: str, opset: int = 18) -> None:
    """``w`` as OpenVINO IR: ``path`` (FILE.xml) and FILE.bin next to it, fp32 weights. Converted
    from the ONNX graph, which keeps the input names and the free batch axis."""
    ov = need("openvino", "OpenVINO export", ExportError)
    onnx_path = path.with_suffix(".onnx")
    write_onnx(w, onnx_path, description, opset)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001
        raise _failed(path, "OpenVINO conversion", e) from None
    finally:
        onnx_path.unlink(missing_ok=True)
    model.set_rt_info(description, [KEY])
    ov.save_model(model, str(path), compress_to_fp16=False)  # fp16 weights would differ from PyTorch


WRITERS = {"onnx": write_onnx, "pt2": write_pt2, "openvino": write_openvino}
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "openvino": ".xml"}
