// pybind11 module prefixattn._C: raw device addresses, strides and a stream handle from the caller;
// no torch headers and no libtorch, so the module is independent of torch's C++ ABI.
#include <pybind11/pybind11.h>

#include "decode.h"

namespace py = pybind11;
using prefixattn::DecodeParams;

PYBIND11_MODULE(_C, m) {
  m.doc() = "prefixattn CUDA decode kernels (bf16/fp16, head dims 64 and 128, inference only)";

  py::class_<DecodeParams> params(m, "DecodeParams",
                                  "Arguments of decode(): addresses (tensor.data_ptr()), sizes, strides in elements.");
  params.def(py::init<>());
#define PA_FIELD(name) params.def_readwrite(#name, &DecodeParams::name)
  PA_FIELD(batch); PA_FIELD(heads_q); PA_FIELD(heads_kv); PA_FIELD(seqlen_q); PA_FIELD(head_dim);
  PA_FIELD(dtype); PA_FIELD(scale); PA_FIELD(causal);
  PA_FIELD(q); PA_FIELD(q_sb); PA_FIELD(q_sh); PA_FIELD(q_ss);
  PA_FIELD(paged); PA_FIELD(seqlen_k); PA_FIELD(k); PA_FIELD(v);
  PA_FIELD(k_sb); PA_FIELD(k_sh); PA_FIELD(k_ss); PA_FIELD(v_sb); PA_FIELD(v_sh); PA_FIELD(v_ss);
  PA_FIELD(key_padding_mask); PA_FIELD(kpm_sb); PA_FIELD(kpm_ss);
  PA_FIELD(kc_sp); PA_FIELD(kc_st); PA_FIELD(kc_sh); PA_FIELD(vc_sp); PA_FIELD(vc_st); PA_FIELD(vc_sh);
  PA_FIELD(block_table); PA_FIELD(bt_sb); PA_FIELD(bt_sp); PA_FIELD(max_pages); PA_FIELD(num_pages);
  PA_FIELD(page_size); PA_FIELD(seq_lens); PA_FIELD(sl_s);
  PA_FIELD(prefix_k); PA_FIELD(prefix_v); PA_FIELD(prefix_len); PA_FIELD(pool_size);
  PA_FIELD(pk_sn); PA_FIELD(pk_sh); PA_FIELD(pk_sp); PA_FIELD(pv_sn); PA_FIELD(pv_sh); PA_FIELD(pv_sp);
  PA_FIELD(prefix_index); PA_FIELD(prefix_index_i64); PA_FIELD(pi_s);
  PA_FIELD(prefix_lengths); PA_FIELD(prefix_lengths_i64); PA_FIELD(pl_s);
  PA_FIELD(out); PA_FIELD(o_sb); PA_FIELD(o_ss); PA_FIELD(o_sh);
  PA_FIELD(lse); PA_FIELD(l_sb); PA_FIELD(l_sh); PA_FIELD(l_ss);
  PA_FIELD(num_splits); PA_FIELD(workspace); PA_FIELD(workspace_elems);
#undef PA_FIELD

  m.def("decode", &prefixattn::decode, py::arg("params"), py::arg("stream"), py::arg("device"),
        "Launch the decode kernel (and the split merge) on `stream` (cudaStream_t as int) of `device`. "
        "Raises ValueError on bad parameters and RuntimeError on CUDA errors; never synchronises.");
  m.def("workspace_elements", &prefixattn::workspace_elements, py::arg("params"),
        "float32 workspace elements decode() needs for these sizes and num_splits.");
  m.def("device_count", &prefixattn::device_count, "Number of CUDA devices; 0 without a device or driver.");
  m.def("require_device", &prefixattn::require_device, "Raise RuntimeError unless a CUDA device is usable.");
  m.def("runtime_version", &prefixattn::runtime_version, "CUDA runtime version the module was built with.");
  m.attr("MAX_SEQLEN_Q") = 16;
  m.attr("HEAD_DIMS") = py::make_tuple(64, 128);
}
