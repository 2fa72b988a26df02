# Configures, builds and runs tests/package in MODE (find_package | add_subdirectory | fetch_content).
# For find_package, peer is first configured and installed into a prefix inside WORK_DIR.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

set(extra "")
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${PEER_SOURCE_DIR} -B ${WORK_DIR}/peer-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DPEER_BUILD_TESTS=OFF -DPEER_BUILD_EXAMPLES=OFF
      -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/peer-build)  # the C interface's static library
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/peer-build)
  set(extra -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
endif()

# No build type (no optimization): what is tested is how the package is found and linked, and an optimized
# consumer took a third longer to build (60 s against 44 s for the three modes).
run(${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/consumer-build -G ${GENERATOR}
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DMODE=${MODE}
    -DPEER_SOURCE_DIR=${PEER_SOURCE_DIR} -DEXPECT_MPI=${EXPECT_MPI} ${extra})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)
run(${WORK_DIR}/consumer-build/consumer)
if(MODE STREQUAL "find_package")
  run(${WORK_DIR}/consumer-build/consumer_c)
  if(EXPECT_MPI)
    run(${WORK_DIR}/consumer-build/consumer_mpi)  # one rank (an MPI singleton)
  endif()
endif()
