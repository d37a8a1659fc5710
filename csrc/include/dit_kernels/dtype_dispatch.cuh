// Host-side dtype switch for launchers: calls f(type_tag<T>{}) with T the element type of dtype
// (read it back as `using T = typename decltype(tag)::type;`).
#pragma once

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"

namespace dk {

template <class T>
struct type_tag {
  using type = T;
};

template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(type_tag<float>{}); break;
    case DType::f16: f(type_tag<half>{}); break;
    case DType::bf16: f(type_tag<bf16>{}); break;
  }
}

}  // namespace dk
