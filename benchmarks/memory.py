"""Peak memory for the benchmarks: the process's resident set (host, Linux) and XLA's plan.

  reset_peak_rss(); ...work...; peak_rss_bytes()   # peak resident memory during the work
  program_bytes(jitted_fn, *args)                    # what XLA allocates for one program
"""

import jax


def reset_peak_rss() -> bool:
  """Resets the kernel's resident-set high-water mark (Linux `clear_refs` 5); False if it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int | None:
  """Peak resident set size of this process since start or the last `reset_peak_rss` (Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def program_bytes(fn, *args) -> int:
  """Bytes XLA plans for one run of jitted `fn(*args)`, per device: arguments + outputs - the
  donated arguments reused as outputs + temporaries (`Compiled.memory_analysis`)."""
  m = fn.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def device_peak_bytes() -> int | None:
  """Peak bytes in use on device 0, where the backend reports it (GPU/TPU; not XLA:CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
