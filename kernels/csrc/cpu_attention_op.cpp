// The inference forward of the CPU attention kernels as C++ operators, for calls without autograd:
//   fmfast::cpu_attention_infer(q, k, v, scale) -> o
//   fmfast::cpu_attention_infer_pair(q1, k1, v1, q2, k2, v2, scale1, scale2) -> (o1, o2)
// q [B, H, N, D], k and v [B, H, M, D], all bf16 or all fp32 on the CPU, D in {32, 64}, unit stride
// over D; o [B, H, N, D] in q's dtype over a [B, N, H, D] buffer (as the Python ops return it).
//
// Why: the Python custom ops cost 40-70 us a call in their dispatch and body (allocation, ctypes
// structures), about 1 ms of a 15 ms FmFormer forward at B=1; through the dispatcher to C++ a call
// costs ~3 us, and inductor's C++ wrapper calls it without Python at all. Autograd, training and
// torch.export keep the Python ops (cpu_attention.py), which compute the same numbers: both call
// the kernels' one forward entry, whose addresses fmf_op_set_entries receives from the loaded
// kernel libraries (so this file links against nothing of theirs). No lse is written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/contiguous.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace {

// the layout of cpu_attention.c's fmf_fwd_problem and cpu_attention_f32.c's fmf_f32_problem
struct Problem {
    const void *q, *k, *v;
    void *o;
    float *lse;
    int64_t B, H, n, m, d;
    int64_t sq[3], sk[3], sv[3], so[3];
    float scale;
};
using Entry = int (*)(const Problem *, int, int);
Entry entry_bf16 = nullptr, entry_f32 = nullptr;

at::Tensor unit(const at::Tensor &x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// one triple checked and its problem filled; `keep` holds the tensors the problem points into
// (q, k, v with unit stride over D, and o) until the kernel has run
at::Tensor prepare(const at::Tensor &q0, const at::Tensor &k0, const at::Tensor &v0, double scale, Problem &p,
                   at::Tensor keep[3]) {
    TORCH_CHECK(q0.device().is_cpu() && k0.device().is_cpu() && v0.device().is_cpu(), "cpu_attention_infer: CPU tensors");
    TORCH_CHECK(q0.dim() == 4 && k0.dim() == 4 && v0.dim() == 4 && k0.sizes() == v0.sizes() &&
                    q0.size(0) == k0.size(0) && q0.size(1) == k0.size(1) && q0.size(3) == k0.size(3),
                "cpu_attention_infer: q [B, H, N, D] and k, v [B, H, M, D], got ", q0.sizes(), ", ", k0.sizes(),
                ", ", v0.sizes());
    TORCH_CHECK((q0.size(3) == 32 || q0.size(3) == 64) && k0.size(2) > 0,
                "cpu_attention_infer: head dim 32 or 64 and M >= 1, got ", k0.sizes());
    const auto dt = q0.scalar_type();
    TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && k0.scalar_type() == dt && v0.scalar_type() == dt,
                "cpu_attention_infer: q, k, v all bf16 or all fp32");
    const at::Tensor &q = keep[0] = unit(q0), &k = keep[1] = unit(k0), &v = keep[2] = unit(v0);
    at::Tensor o = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
    p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = o.data_ptr(), p.lse = nullptr;
    p.B = q.size(0), p.H = q.size(1), p.n = q.size(2), p.m = k.size(2), p.d = q.size(3);
    for (int i = 0; i < 3; i++)
        p.sq[i] = q.stride(i), p.sk[i] = k.stride(i), p.sv[i] = v.stride(i), p.so[i] = o.stride(i);
    p.scale = static_cast<float>(scale);
    return o;
}

void run(const Problem *ps, int count, at::ScalarType dt) {
    Entry e = dt == at::kFloat ? entry_f32 : entry_bf16;
    TORCH_CHECK(e != nullptr, "cpu_attention_infer: the ", dt == at::kFloat ? "fp32" : "bf16",
                " kernel is not loaded here");
    const int rc = e(ps, count, at::get_num_threads());
    TORCH_CHECK(rc == 0, "cpu_attention_infer: the kernel failed (code ", rc,
                ": 1 unsupported head dim, 2 AMX refused, 3 out of memory)");
}

at::Tensor infer(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, double scale) {
    Problem p;
    at::Tensor keep[3];
    at::Tensor o = prepare(q, k, v, scale, p, keep);
    run(&p, 1, q.scalar_type());
    return o;
}

std::tuple<at::Tensor, at::Tensor> infer_pair(const at::Tensor &q1, const at::Tensor &k1, const at::Tensor &v1,
                                              const at::Tensor &q2, const at::Tensor &k2, const at::Tensor &v2,
                                              double scale1, double scale2) {
    TORCH_CHECK(q1.scalar_type() == q2.scalar_type(), "cpu_attention_infer_pair: both triples of one dtype");
    Problem ps[2];
    at::Tensor keep[6];
    at::Tensor o1 = prepare(q1, k1, v1, scale1, ps[0], keep);
    at::Tensor o2 = prepare(q2, k2, v2, scale2, ps[1], keep + 3);
    run(ps, 2, q1.scalar_type());
    return {o1, o2};
}

}  // namespace

// the forward entries of the loaded kernel libraries (either may be NULL: not loaded here)
extern "C" void fmf_op_set_entries(void *bf16, void *f32) {
    entry_bf16 = reinterpret_cast<Entry>(bf16);
    entry_f32 = reinterpret_cast<Entry>(f32);
}

TORCH_LIBRARY_FRAGMENT(fmfast, m) {
    m.def("cpu_attention_infer(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
    m.def("cpu_attention_infer_pair(Tensor q1, Tensor k1, Tensor v1, Tensor q2, Tensor k2, Tensor v2, "
          "float scale1, float scale2) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fmfast, CPU, m) {
    m.impl("cpu_attention_infer", &infer);
    m.impl("cpu_attention_infer_pair", &infer_pair);
}
