"""Prints what CMakeLists.txt needs to know about the installed torch, as KEY=VALUE lines.

We locate torch's headers and libraries through torch.utils.cpp_extension instead of torch's own
CMake config (find_package(Torch) wants CUDA libraries a GPU-less machine does not have and adds
compute_50, which nvcc 13 no longer supports). The CUDA headers torch's headers need beyond nvcc
(cusparse, cublas, ...) come from torch's nvidia-* wheels: site-packages/nvidia/cu13/include (CUDA
13 wheels) or the per-library nvidia/*/include folders of older wheels.
"""
import glob
import os
import sys

import torch
import torch.utils.cpp_extension as ce

torch_dir = os.path.dirname(torch.__file__)
site = os.path.dirname(torch_dir)
nv_inc, nv_lib = [], []
for root in sorted(glob.glob(os.path.join(site, "nvidia", "*"))):
    if os.path.isdir(os.path.join(root, "include")):
        nv_inc.append(os.path.join(root, "include"))
    if os.path.isdir(os.path.join(root, "lib")):
        nv_lib.append(os.path.join(root, "lib"))
print("TORCH_VERSION=" + torch.__version__)
print("TORCH_CUDA=" + (torch.version.cuda or ""))
print("TORCH_INCLUDE_DIRS=" + ";".join(ce.include_paths()))
print("TORCH_LIB_DIR=" + os.path.join(torch_dir, "lib"))
print("TORCH_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("TORCH_NVIDIA_INCLUDE=" + ";".join(nv_inc))
print("TORCH_NVIDIA_LIB=" + ";".join(nv_lib))
sys.stdout.flush()
