// Our ops' loops in the portable build: compiled once per x86-64 level, and the copy for this CPU chosen as the
// extension loads (GCC's target_clones, an ifunc), so they vectorise as widely as the CPU allows, as the native
// build's -march=native makes them. GCC inlines no plain function into such a copy: ISA_CLONES goes on the
// function that holds the loops, or on each function it calls that does. Internal to csrc/.
#pragma once

#ifdef CSRC_ISA_CLONES
#define ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISA_CLONES
#endif
