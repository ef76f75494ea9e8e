"""Export a trained model for deployment outside fmfast.

    fmfast export --checkpoint CKPT --format onnx|torchscript|official --out FILE

onnx / torchscript: a graph taking ``video`` uint8 [B,3,T,W,H] (frames in the stored V2 axis
order) and/or ``current`` float32 [B,2S,3] amperes, returning the logits [B,2] or [B,2,W,H];
the batch size is free. official: the reference code's ``state_dict`` (its key names). Every
export is loaded back and checked against PyTorch before it is put in place.
"""
from __future__ import annotations

from fmfast.cli.common import Parser
from fmfast.engine.export import FORMATS, export


def build_parser(prog: str = "fmfast export") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint or reference-code state_dict")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    msg = export(a.checkpoint, a.format, a.out, a.opset)
    print(f"{a.out}: {a.format} export of {a.checkpoint}; {msg}")
    return 0
