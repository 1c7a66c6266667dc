// The cell ops' operands (csrc/rnn.h) as the row structs of the shared cell
// code (kernels/rnn_cells.cuh), for the CPU and CUDA launchers alike.
// T: the io dtype; A: float32, or float64 for double T. Absent operands
// (the other direction's) stay null.
#pragma once

#include "kernels/rnn_cells.cuh"
#include "rnn.h"

#include <ATen/core/Tensor.h>

namespace ln_ext {

template <class T>
const T* in_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <class T>
T* out_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <class T, class A>
cell::RnnRow<T, A> rows_of(const RnnCellArgs& a) {
  return {in_ptr<T>(a.xproj), in_ptr<T>(a.hproj), in_ptr<T>(a.gamma), in_ptr<T>(a.beta),
          in_ptr<T>(a.dh), out_ptr<T>(a.h), out_ptr<T>(a.da), out_ptr<A>(a.stats),
          out_ptr<A>(a.dgamma_rows), out_ptr<A>(a.dbeta_rows), a.relu};
}

template <class T, class A>
cell::LstmRow<T, A> rows_of(const LstmCellArgs& a) {
  return {in_ptr<T>(a.xgates), in_ptr<T>(a.hproj), in_ptr<T>(a.gamma_h), in_ptr<T>(a.bias),
          in_ptr<T>(a.c_prev), in_ptr<T>(a.gamma_c), in_ptr<T>(a.beta_c), in_ptr<T>(a.dh),
          in_ptr<T>(a.dc), out_ptr<T>(a.h), out_ptr<T>(a.c), out_ptr<T>(a.dc_prev),
          out_ptr<T>(a.dgates), out_ptr<T>(a.dhproj), out_ptr<A>(a.gates), out_ptr<A>(a.stats),
          out_ptr<A>(a.dgamma_h_rows), out_ptr<A>(a.dgamma_c_rows), out_ptr<A>(a.dbeta_c_rows)};
}

template <class T, class A>
cell::GruRow<T, A> rows_of(const GruCellArgs& a) {
  return {in_ptr<T>(a.xzr), in_ptr<T>(a.xn), in_ptr<T>(a.h_prev), in_ptr<T>(a.dh),
          in_ptr<T>(a.hproj), in_ptr<T>(a.gamma_h), in_ptr<T>(a.beta_h), out_ptr<T>(a.h),
          out_ptr<T>(a.dxn), out_ptr<T>(a.dh_prev), out_ptr<T>(a.dxzr), out_ptr<T>(a.dhproj),
          out_ptr<A>(a.gates), out_ptr<A>(a.stats), out_ptr<A>(a.dgamma_h_rows),
          out_ptr<A>(a.dbeta_h_rows)};
}

}  // namespace ln_ext
