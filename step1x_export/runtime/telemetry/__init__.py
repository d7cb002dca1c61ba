"""What the runtime reports: peak memory (`memory`), its counters (`stats`) and step progress that follows the
device (`progress`)."""
