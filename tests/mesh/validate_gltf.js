// Runs the Khronos glTF Validator (npm package gltf-validator) on one file and prints its report as JSON.
// Usage: node validate_gltf.js FILE.glb   (NODE_PATH must reach the gltf-validator package)
const fs = require("fs");
const validator = require("gltf-validator");
const bytes = new Uint8Array(fs.readFileSync(process.argv[2]));
validator
  .validateBytes(bytes, { maxIssues: 200 })
  .then((report) => console.log(JSON.stringify(report)))
  .catch((error) => {
    console.error(String(error));
    process.exit(1);
  });
