// list_tables_emu.cpp -- list_tables.cpp for the emulation build (ema_kernels._C_emu): the same
// file under its own object name, whose "device" tables are CPU tensors.
#ifndef EK_CUDA_EMULATION
#error "list_tables_emu.cpp belongs to the emulation build (EK_CUDA_EMULATION)"
#endif
#include "list_tables.cpp"
