"""The compiler passes: normalize, analyze, plan, insert, fold, verify, emit."""
