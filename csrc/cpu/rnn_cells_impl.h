// The CPU entry points of the LN-RNN cell kernels (rnn_cells_cpu.h), written once
// and compiled by rnn_cells_generic.cpp, rnn_cells_avx2.cpp and rnn_cells_avx512.cpp
// for different ISAs.
// Include it after every other header, inside nothing.
//
// Why the builds cannot mix: everything defined here has internal linkage,
// and the shared row templates are instantiated for `Serial`, a type of this
// file alone, so their instantiations are internal too. What remains shared
// (cell_math.h, c10's conversions) was declared before the AVX2 target was
// switched on, so any out-of-line copy of it is baseline code. `flatten` inlines
// the whole row function, lambdas and float math included, into each entry
// point, where it is compiled (and vectorized) for this file's target.
#ifndef LN_EXT_ISA_NAME
#error "define LN_EXT_ISA_NAME before including rnn_cells_impl.h"
#endif

namespace ln_ext::cpu {
namespace {

struct Serial : cell::SerialRow {};

template <class T, class A>
__attribute__((flatten)) void rnn_fwd(const cell::RnnRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::rnn_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void rnn_bwd(const cell::RnnRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::rnn_bwd_row(Serial{}, rows.at(b, H), H);
}
template <class T, class A>
__attribute__((flatten)) void lstm_fwd(const cell::LstmRow<T, A>& rows, int64_t begin,
                                       int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::lstm_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void lstm_bwd(const cell::LstmRow<T, A>& rows, int64_t begin,
                                       int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::lstm_bwd_row(Serial{}, rows.at(b, H), H);
}
template <class T, class A>
__attribute__((flatten)) void gru_fwd(const cell::GruRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::gru_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void gru_bwd(const cell::GruRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::gru_bwd_row(Serial{}, rows.at(b, H), H);
}

template <class T, class A>
CellKernels<T, A> make_cell_kernels() {
  return {&rnn_fwd<T, A>, &rnn_bwd<T, A>, &lstm_fwd<T, A>,
          &lstm_bwd<T, A>, &gru_fwd<T, A>, &gru_bwd<T, A>};
}

CellKernelSet make_cell_kernel_set() {
  return {LN_EXT_ISA_NAME, make_cell_kernels<float, float>(), make_cell_kernels<double, double>(),
          make_cell_kernels<c10::Half, float>(), make_cell_kernels<c10::BFloat16, float>()};
}

}  // namespace
}  // namespace ln_ext::cpu
