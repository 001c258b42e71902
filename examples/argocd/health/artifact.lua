-- Argo CD health of a clusterregistry.io/v1alpha1 Artifact: one image's copy into the cluster registry.
-- Ready is Healthy; Pending, Copying and Deferred (waiting out GC's read-only window) are Progressing;
-- Failed is Degraded. The message is the Ready condition's, which names the image and the cause.
local hs = {status = "Progressing", message = "Waiting for the artifact reconciler"}
if obj.status == nil or obj.status.phase == nil then
  return hs
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the artifact reconciler to observe the new spec"
  return hs
end
local ready = nil
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Ready" then ready = c end
end
local phase = obj.status.phase
if ready ~= nil and ready.message ~= nil then
  hs.message = phase .. ": " .. ready.message
else
  hs.message = phase
end
if phase == "Ready" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
end
return hs
