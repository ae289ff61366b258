# Shared settings of scripts/build-cuda.sh (real CUDA build) and scripts/check-cuda.sh (compile-check
# with a stand-in nvcc). Sourced, not run.
#
# CUDA 13.0 exactly: our GPU machine's driver is 580 (CUDA 13.0) and PTX from a newer nvcc (13.1+)
# does not load there (see README "CUDA"). cudarc's build script reads the version from
# CUDARC_CUDA_VERSION without asking nvcc.
QOQ_CUDA_TOOLKIT_VERSION=13.0.2
export CUDARC_CUDA_VERSION=13000
# Compute capability the kernels are built for: 90 = H100/H200 (sm_90a). There is no GPU (and no
# nvidia-smi) where we build, so candle-kernels cannot detect it; override with CUDA_COMPUTE_CAP=80 etc.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
case "$CUDA_COMPUTE_CAP" in
  '' | *[!0-9]*) echo "CUDA_COMPUTE_CAP must be a number like 90 (H100/H200) or 80 (A100), got '$CUDA_COMPUTE_CAP'" >&2; exit 2 ;;
esac

# Folder holding the CUDA 13 runtime libraries (libcublas.so.13, libcudart.so.13, libcurand.so.10)
# on a machine whose PyTorch is built for cu13: site-packages/nvidia/cu13/lib, followed by
# ":<folder>" of NCCL's libnccl.so.2 (site-packages/nvidia/nccl/lib) where PyTorch has it: a
# value for LD_LIBRARY_PATH. Prints nothing when there is no cu13 folder. Python: $1, default python3.
qoq_cuda_lib_dir() {
  "${1:-python3}" - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except ImportError:
    pass
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    roots.append(os.path.join(sp, "nvidia"))
dirs = []
for pattern in (os.path.join("cu13", "lib", "libcublas.so.13*"), os.path.join("nccl", "lib", "libnccl.so.2*")):
    for r in roots:
        found = glob.glob(os.path.join(r, pattern))
        if found:
            d = os.path.dirname(found[0])
            if d not in dirs:
                dirs.append(d)
            break
    if not dirs:
        sys.exit(0)
print(":".join(dirs))
PY
}
