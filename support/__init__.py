"""hetflow.support: small leaves every layer may import (they import nothing of hetflow's).

    version   the package version
    cache     the cache directory (calibration, compiled C kernels)
    native    C kernels compiled on first use with the system's C compiler and cached
"""
