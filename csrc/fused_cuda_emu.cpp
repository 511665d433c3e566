// fused_cuda_emu.cpp -- the emulation build of the CUDA kernels (ema_kernels._C_emu): the
// shipped fused_cuda.cu itself, compiled as host C++ against cuda_emu.h.  (A .cpp wrapper so
// that the C++ compiler, not nvcc, builds it; nothing of the kernels is copied.)
#ifndef EK_CUDA_EMULATION
#error "fused_cuda_emu.cpp belongs to the emulation build (EK_CUDA_EMULATION)"
#endif
#define EK_EMULATE_DEVICE 1
#include "fused_cuda.cu"
