# proxy_bench: workspace-proxy against OpenSSH's sshd on loopback (see BENCHMARKS.md).
# Included from bench/CMakeLists.txt only when the proxy is part of the build.
add_executable(proxy_bench ${CMAKE_CURRENT_LIST_DIR}/proxy_bench.cc ${CMAKE_CURRENT_LIST_DIR}/bench_util.cc)
target_include_directories(proxy_bench PRIVATE ${PROJECT_SOURCE_DIR})
target_link_libraries(proxy_bench PRIVATE
  sr::client sr::process sr::base sr::proto sr::tcp_relay
  absl::flags absl::flags_parse absl::flags_usage absl::status absl::statusor absl::strings
  absl::str_format absl::time)
target_compile_definitions(proxy_bench PRIVATE SR_BINARY_DIR="${PROJECT_BINARY_DIR}")
add_dependencies(proxy_bench step-runner workspace-proxy)
sr_warnings(proxy_bench)

# Only that the bench runs to the end on smoke sizes (sshd, proxy, daemon all started and
# compared); no timing assertions on a shared machine. Reported as skipped (exit 77) where sshd
# cannot be started (not installed, or not root and no /run/sshd).
add_test(NAME proxy_bench_smoke COMMAND proxy_bench --quick)
set_tests_properties(proxy_bench_smoke PROPERTIES TIMEOUT 300 LABELS bench SKIP_RETURN_CODE 77)
