// bindings_emu.cpp -- bindings.cpp for the emulation build (ema_kernels._C_emu): the same file,
// compiled under its own name so that its object file does not collide with _C's.
#ifndef EK_CUDA_EMULATION
#error "bindings_emu.cpp belongs to the emulation build (EK_CUDA_EMULATION)"
#endif
#include "bindings.cpp"
