# Included at the end of llama.cpp's own project() call (CMAKE_PROJECT_llama.cpp_INCLUDE, set
# by scripts/llama-wheel.sh). llama-cpp-python forces LLAMA_BUILD_COMMON=ON, which compiles
# llama.cpp's `common` library (argument parsing, chat templates, an HTTP client: about half
# of all the files) that the Python bindings never load. Turning it off here, after that FORCE
# and before llama.cpp reads the option, builds only libllama and the ggml libraries.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: build the common library" FORCE)
