"""The distillation methods by name: ``distill.method`` → ``"module:function"`` of the method's builder.

At the bottom of the package: the config validates ``distill.method`` against it before anything is
built, and :mod:`lightning_distill.methods` imports a builder only when its method is used. Adding a
method is one file in ``lightning_distill/methods/`` and one line here (docs/architecture.md).
"""

METHODS = {
    "prototype": "lightning_distill.methods.prototype:build",
    "sikd": "lightning_distill.methods.sikd:build",
    "pixel": "lightning_distill.methods.pixel_dist:build",
    "cmedl": "lightning_distill.methods.cmedl:build",
}
