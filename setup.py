"""Builds the Cython data plane (ext/) into the one extension module fastlb._dataplane."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# Named "_dataplane" (placed in fastlb/ by ext_package) so that Cython finds the .pxd beside the
# .pyx: a dotted name would make it look for ext/fastlb/_dataplane.pxd instead.
extension = Extension(
    "_dataplane",
    sources=["ext/_dataplane.pyx"],
    extra_compile_args=["-O2"],
)

setup(
    ext_package="fastlb",
    ext_modules=cythonize(
        [extension],
        include_path=["ext"],
        force=True,  # always re-cythonize: generated C is never trusted across edits
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
