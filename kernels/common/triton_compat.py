"""Make loops with a run-time trip count work in Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter (Triton 3.6) turns a scalar into a one-element array and converts it with
int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so
`for i in range(n)` with n not a constexpr fails there. Compiled kernels are unaffected; this
only replaces the interpreter's __index__ with one that reads the element, when interpreting."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_with_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if getattr(_patch_lang_tensor, "__name__", "") != "_patch_lang_tensor_with_scalar_index":
        interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index
