# Fails when a CPU kernel object (compiled for one instruction set) defines a weak symbol: the linker keeps one
# copy of each weak symbol, which could then be code built for another instruction set (CMakeLists.txt).
# Usage: cmake -DNM=<nm> -DOBJECTS=<a.o;b.o> -P check_cpu_objects.cmake
set(shared "")
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only ${object} OUTPUT_VARIABLE symbols RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]* [WVuv] [^\n]*" weak "${symbols}")
  foreach(line IN LISTS weak)
    # the exception-handling personality routine's address: the same data in every object
    if(NOT line MATCHES "DW\\.ref\\.__gxx_personality_v0$")
      string(APPEND shared "\n  ${object}: ${line}")
    endif()
  endforeach()
endforeach()
if(shared)
  message(FATAL_ERROR "CPU kernel objects define weak symbols that another instruction set's objects could "
                      "replace; give them internal linkage (see csrc/cpu_common.h):${shared}")
endif()
