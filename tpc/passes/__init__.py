"""Program-to-program passes: autodiff (the backward program and the tangent kernel)."""
