// LN-RNN cell ops on the CPU: at::parallel_for over the batch rows, each row
// run by the shared row functions of kernels/rnn_cells.cuh on one thread.
#include "../kernels/rnn_cells.cuh"
#include "../rnn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace ln_ext {
namespace {

using cell::SerialRow;

template <class T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <class T>
T* mptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rows per task: enough columns that a task is worth scheduling.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

#define LN_EXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

void rnn_cell_fwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "rnn_cell_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::RnnRow<scalar_t, A> r{};
    r.xproj = cptr<scalar_t>(a.xproj);
    r.hproj = cptr<scalar_t>(a.hproj);
    r.gamma = cptr<scalar_t>(a.gamma);
    r.beta = cptr<scalar_t>(a.beta);
    r.h = mptr<scalar_t>(a.h);
    r.stats = mptr<A>(a.stats);
    at::parallel_for(0, a.batch, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.xproj += b * H; p.hproj += b * H; p.h += b * H; p.stats += b * 2;
        cell::rnn_fwd_row(SerialRow{}, p, H, static_cast<A>(a.eps));
      }
    });
  });
}

void rnn_cell_bwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "rnn_cell_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::RnnRow<scalar_t, A> r{};
    r.xproj = cptr<scalar_t>(a.xproj);
    r.hproj = cptr<scalar_t>(a.hproj);
    r.gamma = cptr<scalar_t>(a.gamma);
    r.beta = cptr<scalar_t>(a.beta);
    r.dh = cptr<scalar_t>(a.dh);
    r.stats = mptr<A>(a.stats);
    r.da = mptr<scalar_t>(a.da);
    r.dgamma_rows = mptr<A>(a.dgamma_rows);
    r.dbeta_rows = mptr<A>(a.dbeta_rows);
    at::parallel_for(0, a.batch, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.xproj += b * H; p.hproj += b * H; p.dh += b * H; p.stats += b * 2;
        p.da += b * H; p.dgamma_rows += b * H; p.dbeta_rows += b * H;
        cell::rnn_bwd_row(SerialRow{}, p, H);
      }
    });
  });
}

void lstm_cell_fwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::LstmRow<scalar_t, A> r{};
    r.xgates = cptr<scalar_t>(a.xgates);
    r.hproj = cptr<scalar_t>(a.hproj);
    r.c_prev = cptr<scalar_t>(a.c_prev);
    r.gamma_h = cptr<scalar_t>(a.gamma_h);
    r.bias = cptr<scalar_t>(a.bias);
    r.gamma_c = cptr<scalar_t>(a.gamma_c);
    r.beta_c = cptr<scalar_t>(a.beta_c);
    r.h = mptr<scalar_t>(a.h);
    r.c = mptr<scalar_t>(a.c);
    r.gates = mptr<A>(a.gates);
    r.stats = mptr<A>(a.stats);
    at::parallel_for(0, a.batch, grain(4 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.xgates += b * 4 * H; p.hproj += b * 4 * H; p.c_prev += b * H;
        p.h += b * H; p.c += b * H; p.gates += b * 4 * H; p.stats += b * 4;
        cell::lstm_fwd_row(SerialRow{}, p, H, static_cast<A>(a.eps));
      }
    });
  });
}

void lstm_cell_bwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "lstm_cell_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::LstmRow<scalar_t, A> r{};
    r.hproj = cptr<scalar_t>(a.hproj);
    r.gamma_h = cptr<scalar_t>(a.gamma_h);
    r.c_prev = cptr<scalar_t>(a.c_prev);
    r.gamma_c = cptr<scalar_t>(a.gamma_c);
    r.beta_c = cptr<scalar_t>(a.beta_c);
    r.dh = cptr<scalar_t>(a.dh);
    r.dc = cptr<scalar_t>(a.dc);
    r.c = mptr<scalar_t>(a.c);
    r.gates = mptr<A>(a.gates);
    r.stats = mptr<A>(a.stats);
    r.dgates = mptr<scalar_t>(a.dgates);
    r.dhproj = mptr<scalar_t>(a.dhproj);
    r.dc_prev = mptr<scalar_t>(a.dc_prev);
    r.dgamma_h_rows = mptr<A>(a.dgamma_h_rows);
    r.dgamma_c_rows = mptr<A>(a.dgamma_c_rows);
    r.dbeta_c_rows = mptr<A>(a.dbeta_c_rows);
    at::parallel_for(0, a.batch, grain(4 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.hproj += b * 4 * H; p.c_prev += b * H; p.c += b * H; p.gates += b * 4 * H;
        p.stats += b * 4; p.dh += b * H; p.dc += b * H;
        p.dgates += b * 4 * H; p.dhproj += b * 4 * H; p.dc_prev += b * H;
        p.dgamma_h_rows += b * 4 * H; p.dgamma_c_rows += b * H; p.dbeta_c_rows += b * H;
        cell::lstm_bwd_row(SerialRow{}, p, H);
      }
    });
  });
}

void gru_cell_fwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "gru_cell_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::GruRow<scalar_t, A> r{};
    r.xzr = cptr<scalar_t>(a.xzr);
    r.xn = cptr<scalar_t>(a.xn);
    r.hproj = cptr<scalar_t>(a.hproj);
    r.h_prev = cptr<scalar_t>(a.h_prev);
    r.gamma_h = cptr<scalar_t>(a.gamma_h);
    r.beta_h = cptr<scalar_t>(a.beta_h);
    r.h = mptr<scalar_t>(a.h);
    r.gates = mptr<A>(a.gates);
    r.stats = mptr<A>(a.stats);
    at::parallel_for(0, a.batch, grain(3 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.xzr += b * 2 * H; p.xn += b * H; p.hproj += b * 3 * H; p.h_prev += b * H;
        p.h += b * H; p.gates += b * 4 * H; p.stats += b * 4;
        cell::gru_fwd_row(SerialRow{}, p, H, static_cast<A>(a.eps));
      }
    });
  });
}

void gru_cell_bwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_DISPATCH(a.hproj.scalar_type(), "gru_cell_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t H = a.hidden;
    cell::GruRow<scalar_t, A> r{};
    r.hproj = cptr<scalar_t>(a.hproj);
    r.h_prev = cptr<scalar_t>(a.h_prev);
    r.gamma_h = cptr<scalar_t>(a.gamma_h);
    r.dh = cptr<scalar_t>(a.dh);
    r.gates = mptr<A>(a.gates);
    r.stats = mptr<A>(a.stats);
    r.dxzr = mptr<scalar_t>(a.dxzr);
    r.dxn = mptr<scalar_t>(a.dxn);
    r.dhproj = mptr<scalar_t>(a.dhproj);
    r.dh_prev = mptr<scalar_t>(a.dh_prev);
    r.dgamma_h_rows = mptr<A>(a.dgamma_h_rows);
    r.dbeta_h_rows = mptr<A>(a.dbeta_h_rows);
    at::parallel_for(0, a.batch, grain(3 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        auto p = r;
        p.hproj += b * 3 * H; p.h_prev += b * H; p.gates += b * 4 * H; p.stats += b * 4;
        p.dh += b * H; p.dxzr += b * 2 * H; p.dxn += b * H; p.dhproj += b * 3 * H;
        p.dh_prev += b * H; p.dgamma_h_rows += b * 3 * H; p.dbeta_h_rows += b * 3 * H;
        cell::gru_bwd_row(SerialRow{}, p, H);
      }
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> rnn_cell_fwd_cpu(
    const at::Tensor& xproj, const at::Tensor& hproj, const at::Tensor& gamma,
    const at::Tensor& beta, double eps) {
  return rnn_cell_fwd_impl(xproj, hproj, gamma, beta, eps, rnn_cell_fwd_cpu_kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_bwd_cpu(
    const at::Tensor& dh, const at::Tensor& xproj, const at::Tensor& hproj,
    const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta) {
  return rnn_cell_bwd_impl(dh, xproj, hproj, stats, gamma, beta, rnn_cell_bwd_cpu_kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(
    const at::Tensor& xgates, const at::Tensor& hproj, const at::Tensor& c_prev,
    const at::Tensor& gamma_h, const at::Tensor& bias, const at::Tensor& gamma_c,
    const at::Tensor& beta_c, double eps) {
  return lstm_cell_fwd_impl(xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, eps,
                            lstm_cell_fwd_cpu_kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_bwd_cpu(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& hproj,
                  const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& gates,
                  const at::Tensor& stats, const at::Tensor& gamma_h,
                  const at::Tensor& gamma_c, const at::Tensor& beta_c) {
  return lstm_cell_bwd_impl(dh, dc, hproj, c_prev, c, gates, stats, gamma_h, gamma_c, beta_c,
                            lstm_cell_bwd_cpu_kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_fwd_cpu(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& hproj,
    const at::Tensor& h_prev, const at::Tensor& gamma_h, const at::Tensor& beta_h, double eps) {
  return gru_cell_fwd_impl(xzr, xn, hproj, h_prev, gamma_h, beta_h, eps, gru_cell_fwd_cpu_kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_cell_bwd_cpu(const at::Tensor& dh, const at::Tensor& hproj, const at::Tensor& h_prev,
                 const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h) {
  return gru_cell_bwd_impl(dh, hproj, h_prev, gates, stats, gamma_h, gru_cell_bwd_cpu_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  m.impl("rnn_cell_fwd", &rnn_cell_fwd_cpu);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd_cpu);
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
  m.impl("gru_cell_fwd", &gru_cell_fwd_cpu);
  m.impl("gru_cell_bwd", &gru_cell_bwd_cpu);
}

}  // namespace ln_ext
