#!/bin/sh
# A C++ compiler that rejects some flags, as Apple's clang rejects -fopenmp: for testing setup.py's probes.
#   REJECT="-fopenmp -march=native"   flags to fail on (the whole argument, as given)
#   REJECT_SOURCES="*/csrc/*.cpp"     fail on compiling sources that match this pattern (a failed build)
#   REAL_CXX=g++                      the compiler that does the work (default c++)
for arg in "$@"; do
  for bad in $REJECT; do
    if [ "$arg" = "$bad" ]; then
      echo "rejecting_cxx: error: unsupported option '$arg'" >&2
      exit 1
    fi
  done
  if [ -n "$REJECT_SOURCES" ]; then
    case "$arg" in
      $REJECT_SOURCES) echo "rejecting_cxx: error: refusing to compile $arg" >&2; exit 1 ;;
    esac
  fi
done
exec ${REAL_CXX:-c++} "$@"
