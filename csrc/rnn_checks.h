// Operand checks shared by the LN-RNN cell ops (rnn.cpp) and sequence ops
// (rnn_sequence.cpp), so that every op rejects bad input with the same words.
#pragma once

#include <ATen/ATen.h>

namespace ln_ext {

// Saved activations and statistics: float32, or float64 for double io.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the operands of one op call against the io tensor that fixes the
// device and dtype (`ref_name`: hproj for the cells, weight_hh for sequences).
class Checker {
 public:
  Checker(const char* op, const at::Tensor& io, const char* ref_name) : op_(op), ref_(ref_name), io_(io) {
    const auto t = io.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                op_, ": ", ref_, " must be float32, float64, float16 or bfloat16, got ", t);
    TORCH_CHECK(io.dim() == 2, op_, ": ", ref_, " must be 2-D, got shape ", io.sizes());
  }

  // An io operand: the dtype and device of the reference and the given shape.
  at::Tensor io(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    return check(t, name, shape, io_.scalar_type());
  }
  // A saved float32 (float64 for double io) operand: gates, stats.
  at::Tensor acc(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    return check(t, name, shape, acc_dtype(io_.scalar_type()));
  }

 private:
  at::Tensor check(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                   at::ScalarType dtype) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is undefined");
    TORCH_CHECK(t.device() == io_.device(), op_, ": ", name, " is on ", t.device(),
                " but ", ref_, " is on ", io_.device());
    TORCH_CHECK(t.scalar_type() == dtype, op_, ": ", name, " must be ", dtype,
                " (from ", ref_, "'s dtype ", io_.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op_, ": ", name, " must have shape ", shape,
                ", got ", t.sizes());
    return t.contiguous();
  }

  const char* op_;
  const char* ref_;
  const at::Tensor& io_;
};

}  // namespace ln_ext
