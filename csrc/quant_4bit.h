// quant_4bit.cu's host entry points that other translation units call.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qlora_kernels {

// The op dequantize_4bit (see csrc/ops.cpp): W's numel values in dtype, from packed and absmax
// (with nested_absmax, nested_code and offset: absmax is the double quant's 8-bit codes).
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           c10::string_view quant_type, int64_t numel, c10::ScalarType dtype,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t nested_blocksize);

}  // namespace qlora_kernels
