"""Export a trained model for deployment outside fmfast.

    fmfast export --checkpoint CKPT --format onnx|pt2|openvino|official --out FILE

onnx (FILE.onnx), pt2 (FILE.pt2, torch.export) and openvino (FILE.xml + FILE.bin, OpenVINO
IR): a graph taking ``video`` uint8 [B,3,T,W,H] (frames in the stored V2 axis order) and/or
``current`` float32 [B,2S,3] amperes, returning ``logits`` [B,2] or [B,2,W,H]; the batch size
is free. official: the reference code's ``state_dict`` (its key names) and FILE.json, a sidecar
that lets fmfast read it back. Every export carries the model's name, task and config and is
loaded back and checked against PyTorch before it is put in place; ``fmfast evaluate`` and
``fmfast detect`` take each of them as --checkpoint. TorchScript is gone (torch.jit is
deprecated): use pt2. onnx and openvino need ``pip install "fmfast[export]"``.
"""
from __future__ import annotations

from fmfast.cli.common import Parser
from fmfast.engine.export import FORMATS, OPSET, export


def build_parser(prog: str = "fmfast export") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint or reference-code state_dict")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="what to write (torchscript is gone: torch.jit is deprecated; use pt2)")
    p.add_argument("--out", required=True, help="file to write (.onnx, .pt2, .xml, or .pth for official)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (onnx and openvino)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    msg = export(a.checkpoint, a.format, a.out, a.opset)
    print(f"{a.out}: {a.format} export of {a.checkpoint}; {msg}")
    return 0
