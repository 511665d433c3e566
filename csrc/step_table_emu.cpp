// step_table_emu.cpp -- step_table.cpp for the emulation build (ema_kernels._C_emu): the same
// file under its own object name, whose tables launch the host-emulated CUDA kernels.
#ifndef EK_CUDA_EMULATION
#error "step_table_emu.cpp belongs to the emulation build (EK_CUDA_EMULATION)"
#endif
#include "step_table.cpp"
