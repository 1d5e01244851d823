//! Canary rollouts declared by annotations on a Service (a placeholder; filled below).
