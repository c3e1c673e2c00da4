// The planar (NCHW) kernel family's entry points (planar.cpp): any depth multiplier, vectors along output rows.
#pragma once

#include "common.h"
#include "geometry.h"

namespace sepconv_cpu::planar {

// Entry points on contiguous (N, C, H, W) tensors into outputs the caller allocated; `weight` is (C * M, 1, KH, KW).
void forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, const Geometry& g,
             const Activation& act);
void input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::Tensor& dinput, const Geometry& g);
void weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::Tensor& dweight, const Geometry& g);

}  // namespace sepconv_cpu::planar
